"""optiscope.metrics"""
