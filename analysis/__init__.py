"""Structure analysis shared by every part: `structure` (coordination, sp/sp2/sp3, RDF, bond
angles, distances between sample and reference sets, `structure_report`) and `plots`."""
