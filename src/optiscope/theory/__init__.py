"""optiscope.theory"""
