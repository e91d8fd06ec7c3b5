"""Promotion: live evidence decides whether a challenger replaces the champion."""
