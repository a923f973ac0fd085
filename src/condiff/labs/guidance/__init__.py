"""The guidance lab: exact scores of Gaussian mixtures (`exact`) and models condiff trains
(`learned`), swept over the guidance strength, with the reference table of the literature
reproduced cell by cell."""
