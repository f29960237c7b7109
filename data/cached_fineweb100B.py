"""Download FineWeb-100B GPT-2 shards: `python data/cached_fineweb100B.py 20` fetches val + 20 train shards."""

import sys

from fineweb_download import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "fineweb100B"))
