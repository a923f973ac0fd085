"""Labs: measurements that check what the literature claims, written up as figures and a report.
`labs.guidance`: what guidance does to confidence and diversity (Wu et al., ICML 2024)."""
