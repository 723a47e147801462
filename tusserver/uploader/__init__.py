"""`tusserver upload`, a tus client: an optional extra, imported by nothing but the command line."""
