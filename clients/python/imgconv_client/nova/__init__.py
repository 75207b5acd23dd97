"""A Nova image backend for the libvirt driver: ``[libvirt] images_type =
imgconv``.

``conf`` holds the ``[imgconv]`` options (oslo.config), ``backend`` the image
backend classes. Both import Nova and oslo; the rest of the client package does
not. integrations/nova/ has the small patch that registers them in Nova 34.0.0.
"""
