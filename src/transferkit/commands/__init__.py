"""One public function per command: the only layer that composes the others."""
