"""Files in and out: what a file may make timm-sila do (`trust`), reading checkpoints and weights (`checkpoint`), and
the one atomic writer of every output (`atomic`)."""
