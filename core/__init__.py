"""kiln.core"""
