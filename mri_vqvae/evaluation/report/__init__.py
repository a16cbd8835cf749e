"""The evaluation report: figures (`figures`), the self-contained page (`html`) and the report of
`mri-vqvae evaluate` built from them (`evaluation_report`)."""
