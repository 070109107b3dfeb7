"""Training methods beyond the baseline (RDB, iEBAKER, FTF), loaded lazily by name through
:data:`rsitr.train.methods.METHODS`."""
