"""The analysis layer: OT distances and the paper's objectives (`distances`), the synthetic study
(`synthetic`), pictures of the kept patches (`pictures`). Imports the core only."""
