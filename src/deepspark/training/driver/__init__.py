"""The driver side of training: the `Estimator`, its checks, and the Spark jobs it runs.

The only modules of `deepspark.training` that import pyspark live here.
"""
