"""Saved weights and saved estimators, shared by training and inference (a floor below both).

No module here imports pyspark.
"""
