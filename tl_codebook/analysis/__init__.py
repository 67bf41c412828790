"""Reading what codes mean: precision and recall of every code against labelled concepts
(`concepts`) and the plots the reports draw (`plots`). The code cache on disk, search and the
code browser of the design (ARCHITECTURE.md) are not written yet."""
