"""Methods (baseline, RDB, iEBAKER, FTF, PEFT baselines, combo) behind one interface and registry:
:mod:`rsitr.methods.base`."""
