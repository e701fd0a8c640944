"""Training: VinDr-SpineXR (or synthetic phantoms) to a model bundle.

So far: the data set reader (``vindr``) and the phantom generator (``phantoms``). Training,
evaluation and export are still to be built (issue 5).
"""
