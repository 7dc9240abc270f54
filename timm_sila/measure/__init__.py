"""Measuring branches: sizes (paper Table 3, `sizes`), per-branch evaluation (`evaluate`), the one reader of
`eval --json` results (`metrics`) and side-by-side speed (`bench`)."""
