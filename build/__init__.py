"""kiln.build"""
