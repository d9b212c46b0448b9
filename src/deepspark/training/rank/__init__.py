"""What runs inside one training task: the loop, rendezvous, checkpoints, metrics.

No module here imports pyspark (DESIGN decision 12): the same code runs under Spark, in tests
over spawned processes, and on machines without Java.
"""
