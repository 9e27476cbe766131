"""optiscope.curvature"""
