"""optiscope.lab"""
