"""absorbing"""
