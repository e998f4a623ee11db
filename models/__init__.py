"""kiln.models"""
