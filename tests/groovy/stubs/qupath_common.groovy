package qupath.lib.common

class ColorTools {
    static int packRGB(int r, int g, int b) { 0 }
}

class GeneralTools {
    static String getNameWithoutExtension(String name) { name }
}
