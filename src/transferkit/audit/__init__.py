"""The data audit's parts: ``checks`` (the measurements on plain arrays), ``findings`` (what it found),
``page`` (audit.html) and ``config`` (its options); the command is ``commands.audit``."""
