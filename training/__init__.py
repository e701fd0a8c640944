"""Training: VinDr-SpineXR (or synthetic phantoms in its layout) to a model bundle.

``vindr`` reads the data set, ``phantoms`` writes synthetic ones (``synthetic``: single spine
radiographs for the demo, the tests and the benchmarks), ``prepare`` caches and exports
a run, ``classify`` trains DERNet with cross-validation, ``detect`` trains YOLO11, ``export``
writes the bundle, ``evaluate`` measures it on the test split, ``ablation`` retrains the detector
per row of the paper's ablation tables. Nothing in the node imports this
package at run time; ``spinenode train`` and ``spinenode demo`` do.
"""
