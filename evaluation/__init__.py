"""Evaluation of frozen backbones: k-NN, linear probe and logistic regression on their features.

`python -m evaluation knn|linear|logreg --weights W --train DATA --val DATA [key=value ...]`; the classifiers
(`evaluation.knn.knn_classify`, `evaluation.linear.linear_probe`, `evaluation.logreg.logistic_regression`)
also work on any feature tensors, and `evaluation.monitor.KnnMonitor` runs a quick k-NN during pretraining.
"""
