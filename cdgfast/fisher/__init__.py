"""cdgfast.fisher"""
