"""The run folder (one owner of every file name), its lock and its typed records."""
