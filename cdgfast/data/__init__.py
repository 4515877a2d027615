"""cdgfast.data"""
