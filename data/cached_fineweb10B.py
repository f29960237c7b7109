"""Download FineWeb-10B GPT-2 shards: `python data/cached_fineweb10B.py 5` fetches val + 5 train shards
(enough for the record-89 recipe, README "Data")."""

import sys

from fineweb_download import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "fineweb10B"))
