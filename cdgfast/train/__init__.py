"""cdgfast.train"""
