"""optiscope.zoo"""
