"""What the command-line tools share: progress displays and the rank lifecycle."""
