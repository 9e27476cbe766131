"""optiscope.optim"""
