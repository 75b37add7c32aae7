"""The Criteo Kaggle and Terabyte data: preprocessing (:mod:`.preprocess`) and loaders (:mod:`.loaders`)."""
