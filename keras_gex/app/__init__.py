"""The command line and the embedded demo."""
