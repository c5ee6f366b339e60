"""Activities: every side effect of a dunning run (rendering, sending, recording) lives here."""
