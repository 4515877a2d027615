"""cdgfast.metrics"""
