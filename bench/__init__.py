"""kiln.bench"""
