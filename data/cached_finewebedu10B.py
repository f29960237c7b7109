"""Download FineWeb-Edu-10B GPT-2 shards: `python data/cached_finewebedu10B.py 9` fetches val + 9 train shards."""

import sys

from fineweb_download import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "finewebedu10B"))
