"""Feeding a model: the one data-config resolver (`config`), the checked image-folder reader of `eval` and
`exit-curve` (`folder`), and whether a batch fits in memory (`memory`)."""
