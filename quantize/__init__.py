"""kiln.quantize"""
