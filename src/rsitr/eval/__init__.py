"""Evaluation of a (backbone, method) on a split: the field's protocol, every tie convention."""
