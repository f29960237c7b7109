"""Reading training logs and comparing speedrun results; the commands live in records/tool.py."""
