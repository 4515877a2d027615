"""cdgfast.analysis"""
