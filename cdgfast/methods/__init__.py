"""cdgfast.methods"""
