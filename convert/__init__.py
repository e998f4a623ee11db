"""kiln.convert"""
