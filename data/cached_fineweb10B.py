"""Download FineWeb-10B GPT-2 shards: `python data/cached_fineweb10B.py 9` fetches val + 9 train shards."""

import sys

from fineweb_download import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "fineweb10B"))
