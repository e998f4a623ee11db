"""kiln.serve"""
