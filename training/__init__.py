"""Training: VinDr-SpineXR (or synthetic phantoms) to a model bundle. Built in issue 5."""
