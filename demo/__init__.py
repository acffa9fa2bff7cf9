"""`make demo`'s own commands: prepare a user's image folder for the pipeline, and summarise a finished demo from
its artefacts. The stages themselves run through their public command lines (see the Makefile)."""
